#!/usr/bin/env bash
# Builds every fuzz target once (cargo fuzz build: release, debug assertions,
# AddressSanitizer) and runs each for a bounded time, starting from its seed
# corpus in fuzz/seeds/<target>. Nothing is written into the repository:
# each run's corpus is a fresh temporary directory (the seeds are read
# only), and crash files go to fuzz/target/fuzz-artifacts/<target>/.
#
#   fuzz/run.sh                 all targets, FUZZ_SECONDS (30) each
#   FUZZ_SECONDS=5 fuzz/run.sh net_tx qmp_reply
#
# Environment:
#   FUZZ_SECONDS    seconds per target (default 30)
#   FUZZ_TIMEOUT    seconds one input may take before it counts as a hang
#                   (default 10)
#   FUZZ_TOOLCHAIN  "nightly" or "stable" (default: nightly when rustup has
#                   one; stable runs cargo-fuzz's -Z flags with
#                   RUSTC_BOOTSTRAP=1)
#   FUZZ_ARTIFACTS  where crash files go (default fuzz/target/fuzz-artifacts)
#   CARGO_TARGET_DIR  where the build goes (default fuzz/target)
#   FUZZ_BUILD      0: run the targets already built, without building
#
# Exits non-zero when a build fails, or a target crashes, hangs, leaks or
# otherwise exits non-zero; the crash file and the end of libFuzzer's
# output are printed. The last lines are one summary per target: runs,
# coverage (cov), features (ft) and corpus size (entries/bytes) at the end.
set -euo pipefail

fuzz_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
seconds=${FUZZ_SECONDS:-30}
timeout=${FUZZ_TIMEOUT:-10}
target_dir=${CARGO_TARGET_DIR:-$fuzz_dir/target}
artifacts=${FUZZ_ARTIFACTS:-$fuzz_dir/target/fuzz-artifacts}

toolchain=${FUZZ_TOOLCHAIN:-}
if [[ -z $toolchain ]]; then
    if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
        toolchain=nightly
    else
        toolchain=stable
    fi
fi
case $toolchain in
nightly) cargo=(cargo +nightly) ;;
stable)
    # cargo-fuzz needs -Z flags (sanitizer, coverage passes); stable's
    # rust-std ships the sanitizer runtimes, so stable builds with them
    # once the unstable flags are allowed.
    export RUSTC_BOOTSTRAP=1
    cargo=(cargo +stable)
    ;;
*)
    echo "FUZZ_TOOLCHAIN must be nightly or stable, not $toolchain" >&2
    exit 2
    ;;
esac

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz" >&2
    cargo install --locked cargo-fuzz
fi

cd "$fuzz_dir"
if (($#)); then
    targets=("$@")
else
    mapfile -t targets < <("${cargo[@]}" fuzz list)
fi

host=$(rustc -vV | sed -n 's/^host: //p')
if [[ ${FUZZ_BUILD:-1} != 0 ]]; then
    echo "== building ${#targets[@]} targets with the $toolchain toolchain" >&2
    build_start=$SECONDS
    "${cargo[@]}" fuzz build
    echo "== built in $((SECONDS - build_start)) s" >&2
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/capsid-fuzz.XXXXXX")
trap 'rm -rf "$work"' EXIT

summary=()
failed=0
run_start=$SECONDS
for target in "${targets[@]}"; do
    binary=$target_dir/$host/release/$target
    seeds=$fuzz_dir/seeds/$target
    corpus=$work/corpus/$target
    log=$work/$target.log
    mkdir -p "$corpus" "$artifacts/$target"
    if [[ ! -d $seeds ]]; then
        echo "== $target has no seeds in $seeds" >&2
        failed=1
        summary+=("$(printf '%-18s FAILED (no seeds)' "$target")")
        continue
    fi
    echo "== $target: ${seconds} s" >&2
    status=0
    "$binary" "$corpus" "$seeds" \
        -max_total_time="$seconds" \
        -timeout="$timeout" \
        -artifact_prefix="$artifacts/$target/" \
        -print_final_stats=1 \
        >"$log" 2>&1 || status=$?

    runs=$(sed -n 's/^Done \([0-9]*\) runs in .*/\1/p' "$log" | tail -n1)
    stats=$(grep -E '^#[0-9]+[[:space:]].*cov: ' "$log" | tail -n1 || true)
    cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$stats")
    ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$stats")
    # A run cut short prints no "Done": its last stats line counts.
    runs=${runs:-$(sed -n 's/^#\([0-9]*\).*/\1/p' <<<"$stats")}
    corp=$(sed -n 's/.* corp: \([0-9]*\/[0-9]*[a-zA-Z]*\).*/\1/p' <<<"$stats")
    line=$(printf '%-18s execs %-9s cov %-6s ft %-6s corpus %s' \
        "$target" "${runs:-?}" "${cov:-?}" "${ft:-?}" "${corp:-?}")
    if ((status != 0)); then
        failed=1
        crash=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n1)
        cp "$log" "$artifacts/$target/libfuzzer.log"
        echo "== $target FAILED (exit $status)" >&2
        echo "== crash file: ${crash:-none written}" >&2
        echo "== full log: $artifacts/$target/libfuzzer.log; its end:" >&2
        tail -n 40 "$log" >&2
        line="$line  FAILED (exit $status${crash:+, $crash})"
    fi
    summary+=("$line")
done

echo "== ran ${#targets[@]} targets in $((SECONDS - run_start)) s" >&2
printf '%s\n' "${summary[@]}"
exit "$failed"
