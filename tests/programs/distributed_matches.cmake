# Two processes (Gloo on 127.0.0.1, --nproc 2) at --batch-size 2 train to the same tuner weights as
# one process at --batch-size 2 --grad-accum 2: the same global batch of 4, the same samples
# (SampleOrder gives rank r of W micro-batch m · W + r) and the same noise (step_generator of that
# global micro-batch). Bitwise, not within a tolerance: the mean of two gradients, (g0 + g1) / 2,
# is exactly what accumulating g0 / 2 + g1 / 2 gives (halving is exact in floating point). Both
# ranks must end with bitwise the same weights (the run compares their hashes and says so).
string(REPLACE "|" ";" EXTRA "${EXTRA}")
string(REPLACE "|" ";" FILES "${FILES}")
set(common_flags --max-steps ${STEPS} --checkpoint-every 3 --log-every 100 --validation-steps 2 ${EXTRA})
file(REMOVE_RECURSE ${WORK_DIR})
execute_process(COMMAND ${TRAIN} --output ${WORK_DIR}/two --nproc 2 --batch-size 2 ${common_flags}
                RESULT_VARIABLE r1 OUTPUT_VARIABLE out ERROR_VARIABLE err)
execute_process(COMMAND ${TRAIN} --output ${WORK_DIR}/one --batch-size 2 --grad-accum 2 ${common_flags}
                RESULT_VARIABLE r2)
if(r1 OR r2)
  message(FATAL_ERROR "a training run failed (${r1} ${r2}):\n${out}\n${err}")
endif()
if(NOT out MATCHES "all 2 processes end with the same weights")
  message(FATAL_ERROR "the two ranks did not confirm the same weights:\n${out}")
endif()
string(REGEX MATCHALL "step [0-9]+/" progress "${out}")
list(LENGTH progress lines)
if(NOT lines EQUAL 1)  # rank 0 alone prints progress (--log-every 100: the last step)
  message(FATAL_ERROR "expected one progress line (rank 0's), got ${lines}:\n${out}")
endif()
foreach(file ${FILES})
  execute_process(COMMAND ${CMAKE_COMMAND} -E compare_files ${WORK_DIR}/one/${file} ${WORK_DIR}/two/${file}
                  RESULT_VARIABLE different)
  if(different)
    message(FATAL_ERROR "${file} differs between two processes and one process with the same global batch")
  endif()
endforeach()
file(STRINGS ${WORK_DIR}/two/loss.csv losses)
list(LENGTH losses n)
math(EXPR expected "${STEPS} + 1")
if(NOT n EQUAL expected)
  message(FATAL_ERROR "loss.csv of the two-process run has ${n} lines, expected ${expected}")
endif()
