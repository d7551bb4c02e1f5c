#!/usr/bin/env bash
# Device call 2 (2026-12-03 PM): every function with one shared memory carveout (the back-to-back
# PeerTimeout: a lagging rank's local kernel waiting for a multiprocessor of its split), the new
# lagging-rank and mismatch tests, and the header read before the data (fused 1-stage, rows of
# 8192: expected ~0.2 us off those rows, nothing at 4096, which has a spare warp); then the
# conformance suite.
set -u
cd "$(dirname "$0")"
. ./nvrtc.sh
R=/tmp/res; mkdir -p $R
{ date -u +%FT%TZ; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; } > $R/start.txt
k() { local t=$1 name=$2; shift 2; echo "== $name $(date -u +%T)"; env "$@" RUST_BACKTRACE=0 ARFUSE_REQUIRE_BACKENDS=cuda timeout $t ./arfuse-kernels-gpu $TESTS --test-threads=1 --nocapture > $R/$name.txt 2>&1; echo "rc=$?" >> $R/$name.txt; }
TESTS=cuda::a_lagging_rank; k 40 lagging-fixed X=1
TESTS=cuda::a_lagging_rank; k 40 lagging-default-carveout ARFUSE_KERNEL_DEFINES=-DARFUSE_EXP_DEFAULT_CARVEOUT
TESTS=cuda::a_peer_in_another_call; k 40 mismatch X=1
TESTS=cuda::thousand_back_to_back; for i in 1 2 3 4; do k 45 thousand-$i X=1; done
run() { local t=$1 name=$2; shift 2; echo "== $name $(date -u +%T)"; timeout $t "$@" > $R/$name.md 2>&1; echo "rc=$?" >> $R/$name.md; }
run 90 hot2 ./arfuse-bench --world 2 --repeats 20 --modes decode --decode-tokens 1,16,64,80,128 --hidden 4096,8192 --no-large --input-sets 1 --json $R/hot2.json
echo "== hot2-default-carveout $(date -u +%T)"; ARFUSE_KERNEL_DEFINES=-DARFUSE_EXP_DEFAULT_CARVEOUT timeout 60 ./arfuse-bench --world 2 --repeats 20 --modes decode --decode-tokens 1,16,64 --hidden 4096,8192 --no-large --input-sets 1 --json $R/hot2-dc.json > $R/hot2-default-carveout.md 2>&1; echo "rc=$?" >> $R/hot2-default-carveout.md
TESTS="cuda::kernels_match_the_cpu_backend cuda::every_call_with cuda::graph_replay cuda::stalled_peer"; k 255 conformance X=1
date -u +%FT%TZ > $R/end.txt
cd $R && tar czf $OUT/res.tgz .
for f in lagging-fixed lagging-default-carveout mismatch thousand-1 thousand-2 thousand-3 thousand-4; do echo "-- $f $(tail -1 $R/$f.txt) $(grep -h ': .*exact\|nothing written\|rounds' $R/$f.txt | cut -c1-110 | head -1)"; grep -h "error word\|gave up\|panicked" $R/$f.txt | cut -c1-140 | head -3; done
echo "-- conformance $(tail -1 $R/conformance.txt)"; grep -h "^test \|test result\|panicked" $R/conformance.txt | cut -c1-150 | head -8
for f in hot2 hot2-default-carveout; do echo "-- $f $(tail -1 $R/$f.md)"; grep "^| [0-9]" $R/$f.md | cut -c1-110 | head -12; grep -i "error\|timeout\|mismatch\|differ" $R/$f.md | head -2 | cut -c1-200; done
