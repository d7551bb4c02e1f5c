#!/usr/bin/env bash
# Device call 1 (2026-12-08): issue 13 item 3 by leaving stages out of the fused 2-stage call, and
# issue 17's epilogue base cost split in two.
# Written down before:
# - 2-stage without barrier 2e + 1 (NO_CLOSING_BARRIER) and without both (NO_2STAGE_BARRIERS):
#   the floor of any barrier-free 2-stage design. Sentinels replacing barrier 2e saved nothing at
#   512/1024x4096 (2026-12-03), so I expect the mid band (256-2048 x 4096) within ~1 us of the
#   default with both barriers gone (a barrier round trip is ~1-2 us at one GPU); decode-size
#   2-stage calls (16x4096, 9-11 us) should drop by 2-4 us; prefill 8192 unchanged (bytes).
# - FP8 per tensor: the epilogue kernel with the plain output stage (EPI_PLAIN_OUT) against no
#   codes (FP8_NO_CODES): if the 0.4 us base cost at 1x4096 is epilogue_out's branches, EPI_PLAIN_OUT
#   gives the plain figure (2.8); if it is the kernel's other differences (tid re-read, residual
#   branch), it stays at ~3.3. Hot inputs (--input-sets 1) against rotating: same ratio expected.
set -u
cd "$(dirname "$0")"
. ./nvrtc.sh
R=/tmp/res; mkdir -p $R
{ date -u +%FT%TZ; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; } > $R/start.txt
run() { local t=$1 name=$2 defs=$3; shift 3; echo "== $name $(date -u +%T)"; ARFUSE_KERNEL_DEFINES="$defs" timeout $t "$@" > $R/$name.md 2>&1; echo "rc=$?" >> $R/$name.md; }
P="--world 2 --repeats 5 --modes prefill --prefill-tokens 256,512,1024,2048,8192 --hidden 4096 --no-large"
D2="--world 2 --repeats 10 --modes decode --no-large --decode-tokens 16,128 --hidden 4096 --input-sets 1"
run 90 mid-two "" ./arfuse-bench $P --json $R/mid-two.json
run 90 mid-noclose "-DARFUSE_EXP_NO_CLOSING_BARRIER" ./arfuse-bench $P --json $R/mid-noclose.json
run 90 mid-none "-DARFUSE_EXP_NO_2STAGE_BARRIERS" ./arfuse-bench $P --json $R/mid-none.json
run 120 mid-sentinel "-DARFUSE_EXP_SENTINEL_SCATTER" ./arfuse-bench $P --json $R/mid-sentinel.json
run 90 mid-two-2 "" ./arfuse-bench $P --json $R/mid-two-2.json
run 60 dec-two "" ./arfuse-bench $D2 --json $R/dec-two.json
run 60 dec-none "-DARFUSE_EXP_NO_2STAGE_BARRIERS" ./arfuse-bench $D2 --json $R/dec-none.json
F="--world 2 --repeats 20 --modes decode --no-large --decode-tokens 1,16,64 --hidden 4096,8192 --fp8 e4m3fn:per-tensor=0.01"
run 90 fp8-tensor "" ./arfuse-bench $F --json $R/fp8-tensor.json
run 90 fp8-tensor-hot "" ./arfuse-bench $F --input-sets 1 --json $R/fp8-tensor-hot.json
run 90 fp8-nocodes "-DARFUSE_EXP_FP8_NO_CODES" ./arfuse-bench $F --json $R/fp8-nocodes.json
run 90 fp8-plainout "-DARFUSE_EXP_EPI_PLAIN_OUT" ./arfuse-bench $F --json $R/fp8-plainout.json
date -u +%FT%TZ > $R/end.txt
cd $R && tar czf $OUT/res.tgz .
for f in mid-two mid-noclose mid-none mid-sentinel mid-two-2 dec-two dec-none; do echo "-- $f $(tail -1 $R/$f.md)"; grep "^| [0-9]" $R/$f.md | awk -F'|' '{print $2"|"$6"|"$7"|"$8"|"$12}' | head -6; grep -ci "differ" $R/$f.md; done
for f in fp8-tensor fp8-tensor-hot fp8-nocodes fp8-plainout; do echo "-- $f $(tail -1 $R/$f.md)"; grep -A8 "| shape | fused-1stage | +fp8" $R/$f.md | grep "^| [0-9]" | cut -c1-120; done
