#!/bin/bash
# The time of six distribution programs plain and under `uhmm run` (no
# chaos), alternated, median of REPS runs each, outputs compared byte for
# byte; then the geometric mean of the ratios. One more run of each under
# `--chaos 1000` gives its time and the CPU faults served from device
# memory. Run on a quiet machine, as
# root, after `cargo build --release`.
#
#   scripts/run_overhead.sh [REPS]        (default 3)
set -euo pipefail
REPS=${1:-3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
UHMM="$ROOT/target/release/uhmm"
[ -x "$UHMM" ] || { echo "build first: cargo build --release" >&2; exit 2; }
for p in python3 sort xz gzip sqlite3 sha256sum; do
    command -v "$p" >/dev/null || { echo "missing program: $p" >&2; exit 2; }
done
DIR=$(mktemp -d /tmp/uhmm-overhead.XXXXXX)
trap 'rm -rf "$DIR"' EXIT
cd "$DIR"
# Inputs, the same bytes every run.
python3 -c "
import random
r = random.Random(1)
with open('in100.txt', 'w') as f:
    for i in range(1_300_000):
        f.write('%016x %s\n' % (r.getrandbits(64), 'x' * r.randrange(40, 120)))
"
head -c 40000000 in100.txt > in40.txt

PY_SORT='import hashlib, random
random.seed(7)
a = [(random.random(), str(i)) for i in range(2000000)]
a.sort()
d = {k: v for v, k in a[:500000]}
print(len(a), len(d), hashlib.sha256(repr(a[::97]).encode()).hexdigest())'
PY_THREADS='import hashlib, threading
out = [None] * 4
def work(k):
    a = [(i * 2654435761 + k) % 1000003 for i in range(1000000)]
    a.sort()
    out[k] = hashlib.sha256(repr(a).encode()).hexdigest()
ts = [threading.Thread(target=work, args=(k,)) for k in range(4)]
[t.start() for t in ts]
[t.join() for t in ts]
print(out)'
SQL="create table t(a integer, b text);
with recursive c(x) as (select 1 union all select x+1 from c where x<1000000)
insert into t select (x*7919)%1000003, hex((x*2654435761)%4294967296) from c;
select count(*), sum(a), max(b) from t;
create index i on t(b);
select a from t order by b limit 5;
select sum(length(b)), min(b) from (select b from t order by a);
select a%100, count(*) from t group by a%100 order by 2 desc, 1 limit 3;"

names=(python-sort python-threads sort xz pipeline sqlite3)
cmds=(
    "python3 -c \"\$PY_SORT\""
    "python3 -c \"\$PY_THREADS\""
    "sort --parallel=2 -S 400M in100.txt | sha256sum"
    "xz -1 -T2 -c in40.txt > o.xz && xz -dc o.xz | sha256sum"
    "sort -S 32M in40.txt | gzip -c | gunzip -c | sort -r -S 32M | sha256sum"
    "sqlite3 :memory: \"\$SQL\""
)
export PY_SORT PY_THREADS SQL

now() { date +%s.%N; }
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

printf '%-15s %9s %11s %6s %14s %14s %18s\n' program plain "uhmm run" ratio "peak managed" \
    "--chaos 1000" "faults from device"
logsum=0
for k in "${!names[@]}"; do
    plain=() under=()
    for ((r = 0; r < REPS; r++)); do
        t0=$(now); bash -c "${cmds[$k]}" > plain.out; t1=$(now)
        plain+=("$(echo "$t1 - $t0" | bc)")
        t0=$(now); "$UHMM" run --stats stats.jsonl -- bash -c "${cmds[$k]}" > under.out; t1=$(now)
        under+=("$(echo "$t1 - $t0" | bc)")
        cmp -s plain.out under.out || { echo "${names[$k]}: outputs differ" >&2; exit 1; }
    done
    p=$(median "${plain[@]}") u=$(median "${under[@]}")
    ratio=$(echo "scale=4; $u / $p" | bc)
    logsum=$(echo "scale=8; $logsum + l($ratio)" | bc -l)
    # Summed over the run's processes, from their exit reports.
    peak=$(grep -o '"managed_bytes_peak":[0-9]*' stats.jsonl | cut -d: -f2 |
        awk '{s+=$1} END {printf "%.0f", s/1048576}')
    # One run under chaos: its time, and CPU faults served from device
    # memory (summed over processes); output compared too.
    t0=$(now); "$UHMM" run --chaos 1000 --stats stats.jsonl -- bash -c "${cmds[$k]}" > under.out; t1=$(now)
    cmp -s plain.out under.out || { echo "${names[$k]}: outputs differ under chaos" >&2; exit 1; }
    chaos=$(echo "$t1 - $t0" | bc)
    served=$(grep -o '"faults_device":[0-9]*' stats.jsonl | cut -d: -f2 | awk '{s+=$1} END {print s+0}')
    printf '%-15s %8.2fs %10.2fs %6.2f %10s MiB %13.2fs %18s\n' "${names[$k]}" "$p" "$u" "$ratio" \
        "$peak" "$chaos" "$served"
done
printf 'geometric mean: %.3f\n' "$(echo "scale=8; e($logsum / ${#names[@]})" | bc -l)"
