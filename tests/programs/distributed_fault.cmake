# A rank that dies (SIGNAL=KILL) or hangs (SIGNAL=STOP) in a run started by hand (torchrun's
# environment, no launcher watching): the other rank stops on its own, non-zero, within
# --dist-timeout and a few heartbeats, naming rank 1; the last checkpoint it wrote still resumes, on
# one process with the same global batch. PORT: the rendezvous port of this test.
file(REMOVE_RECURSE ${WORK_DIR})
file(MAKE_DIRECTORY ${WORK_DIR})
set(out_dir ${WORK_DIR}/out)
set(timeout 10)
set(complete "step-[0-9][0-9][0-9][0-9][0-9][0-9][0-9][0-9]")  # not a save under way (step-*.tmp-*)
set(world "WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=${PORT}")
set(flags "--output ${out_dir} --max-steps 100000 --checkpoint-every 2 --log-every 1 --dist-timeout ${timeout}")
set(script "
env RANK=0 ${world} ${TRAIN} ${flags} > ${WORK_DIR}/rank0.log 2>&1 &
p0=$!
env RANK=1 ${world} ${TRAIN} ${flags} > ${WORK_DIR}/rank1.log 2>&1 &
p1=$!
i=0
while ! ls -d ${out_dir}/checkpoints/${complete} > /dev/null 2>&1; do
  sleep 0.2; i=$((i + 1))
  if [ $i -gt 1500 ] || ! kill -0 $p0 2>/dev/null; then kill -9 $p0 $p1 2>/dev/null; echo 'no checkpoint'; exit 3; fi
done
kill -${SIGNAL} $p1
start=$(date +%s)
wait $p0
echo \"rank 0 exit $?\"
echo \"rank 0 took $(( $(date +%s) - start )) s\"
kill -9 $p1 2>/dev/null
wait $p1 2>/dev/null
exit 0
")
execute_process(COMMAND sh -c "${script}" OUTPUT_VARIABLE out ERROR_VARIABLE err)
file(READ ${WORK_DIR}/rank0.log log)
if(NOT out MATCHES "rank 0 exit ([0-9]+)" OR CMAKE_MATCH_1 EQUAL 0)
  message(FATAL_ERROR "rank 0 did not stop with an error after SIG${SIGNAL} to rank 1:\n${out}${err}\n${log}")
endif()
if(NOT log MATCHES "rank 1 is gone or hung")
  message(FATAL_ERROR "rank 0's error does not name rank 1:\n${log}")
endif()
string(REGEX MATCH "took ([0-9]+) s" took "${out}")
math(EXPR bound "${timeout} + 10")
if(CMAKE_MATCH_1 GREATER bound)
  message(FATAL_ERROR "rank 0 took ${CMAKE_MATCH_1} s to stop (--dist-timeout ${timeout}):\n${log}")
endif()
# The newest checkpoint resumes in a world of one: 2 processes × batch 1 = 1 × batch 1 × 2 steps.
file(GLOB checkpoints LIST_DIRECTORIES true ${out_dir}/checkpoints/${complete})
list(SORT checkpoints)
list(GET checkpoints -1 newest)
string(REGEX MATCH "[0-9]+$" step "${newest}")
math(EXPR step "${step}")
math(EXPR more "${step} + 1")
execute_process(COMMAND ${TRAIN} --output ${out_dir} --resume latest --max-steps ${more} --grad-accum 2
                        --checkpoint-every 2 --log-every 1
                RESULT_VARIABLE result OUTPUT_VARIABLE resumed ERROR_VARIABLE resumed_err)
if(result OR NOT resumed MATCHES "resumed from .*step-0*${step} at step ${step}")
  message(FATAL_ERROR "the last checkpoint did not resume (exit ${result}):\n${resumed}${resumed_err}")
endif()
message(STATUS "SIG${SIGNAL} to rank 1: rank 0 stopped naming it; step ${step} resumed on one process")
