#!/usr/bin/env bash
# How large the commits since BASE are, the two ways a submission is limited:
#   packed  - the objects they add, packed as git sends them          (limit 512 MiB per stop)
#   diffs   - their patches, binary files included, added up as text  (limit 256 MiB per stop)
# A stop whose commits pass either limit lands none of them, so run this before stopping, with
# BASE = the commit the session started from (long training runs: commit a run folder's
# checkpoint once or twice a session, not at every checkpoint_every; each commit of a 12 MiB
# checkpoint adds ~15 MiB of diffs).
#   scripts/submission_size.sh [BASE]      (default: origin/main if it exists, else HEAD~1)
set -euo pipefail
cd "$(dirname "$0")/.."
base="${1:-}"
if [ -z "$base" ]; then
  if git rev-parse -q --verify origin/main >/dev/null; then base=origin/main; else base=HEAD~1; fi
fi
git rev-parse -q --verify "$base^{commit}" >/dev/null || { echo "error: $base is not a commit" >&2; exit 2; }
commits=$(git rev-list --count "$base..HEAD")
packed=$(git rev-list --objects "$base..HEAD" | git pack-objects --stdout -q | wc -c)
diffs=$(git log -p --binary --format= "$base..HEAD" | wc -c)
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
echo "commits since $base: $commits"
echo "packed: $(mib "$packed") of 512 MiB"
echo "diffs:  $(mib "$diffs") of 256 MiB"
if [ "$packed" -gt $((400 * 1048576)) ] || [ "$diffs" -gt $((200 * 1048576)) ]; then
  echo "warning: close to a limit; squash or drop commits of large binary files before stopping" >&2
  exit 1
fi
