#!/usr/bin/env bash
# Instructions per request on each path of the gateway bench, counted by callgrind (part 4 of
# benches/gateway.rs). Unlike rates and CPU times, the count is the same for the same code
# whatever else the machine or its hypervisor is doing, so two versions of cmg compare on any
# day. The load generator is included, as in the bench's CPU figures: "relayed" minus "direct"
# is what the gateway + tunnel hop adds.
#
#   crates/cmg-bench/callgrind.sh [REQUESTS]     (default 2000 per path; a run takes minutes)
#
# CMG_BENCH_PATHS narrows the paths (any part of a label), CMG_BENCH_DEVICES sets the devices
# (default 8: fewer handshakes to wait for under valgrind). The raw dumps stay in the folder
# printed at the end, for callgrind_annotate.
set -euo pipefail

requests=${1:-2000}
case $requests in
'' | *[!0-9]*)
    echo "callgrind.sh: REQUESTS must be a whole number, not '$requests'" >&2
    exit 2
    ;;
esac
if ! command -v valgrind >/dev/null; then
    echo "callgrind.sh: valgrind is not installed (Debian: apt-get install valgrind)" >&2
    exit 1
fi
if [ "$(uname -m)" != x86_64 ]; then
    echo "callgrind.sh: the bench marks its runs for callgrind on x86_64 only" >&2
    exit 1
fi

cd "$(dirname "$0")/../.."
bench=$(cargo bench -p cmg-bench --bench gateway --no-run 2>&1 |
    sed -n 's/.*Executable .*(\(.*gateway-[0-9a-f]*\)).*/\1/p' | tail -n 1)
if [ -z "$bench" ] || [ ! -x "$bench" ]; then
    echo "callgrind.sh: cannot build the gateway bench; run 'cargo bench -p cmg-bench --bench gateway --no-run' to see why" >&2
    exit 1
fi

out=$(mktemp -d "${TMPDIR:-/tmp}/cmg-callgrind.XXXXXX")
echo "callgrind.sh: $requests requests per path under callgrind; output in $out" >&2
if ! CMG_TEST_POSTGRES='' CMG_BENCH_PARTS=instructions CMG_BENCH_REQUESTS="$requests" \
    CMG_BENCH_DEVICES="${CMG_BENCH_DEVICES:-8}" \
    valgrind --tool=callgrind --callgrind-out-file="$out/callgrind.out" \
    "$bench" --bench >"$out/bench.log" 2>"$out/valgrind.log"; then
    echo "callgrind.sh: the bench failed under valgrind; see $out/bench.log and $out/valgrind.log" >&2
    exit 1
fi
grep '^instructions' "$out/bench.log" | grep -v ' 0 failed$' >&2 || true

# One dump per run, numbered in the order the runs were made.
found=0
for dump in $(ls "$out"/callgrind.out.* 2>/dev/null | sort -t. -k3 -n); do
    label=$(sed -n 's/^desc: Trigger: Client Request: //p' "$dump")
    # `totals` counts from the bench's zeroing; `summary` from the previous dump.
    total=$(awk '/^totals:/ { print $2; exit }' "$dump")
    [ -n "$label" ] && [ -n "$total" ] || continue
    count=${label##*| }
    count=${count%% *}
    printf '%-52s %9d instructions/request\n' "${label% | *}" $((total / count))
    found=1
done
if [ "$found" = 0 ]; then
    echo "callgrind.sh: no run was dumped; see $out/bench.log" >&2
    exit 1
fi
