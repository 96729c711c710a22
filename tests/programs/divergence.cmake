# A run that diverges (a learning rate of 10^30) stops at the step where the loss or the weights
# stop being finite, exits non-zero, and writes no weights file; the checkpoint it names as the
# last good one resumes (to that very step) into finite weights.
set(flags --checkpoint-every 1 --keep-last 0 --log-every 100 --validation-steps 1)
file(REMOVE_RECURSE ${WORK_DIR})
execute_process(COMMAND ${TRAIN} --output ${WORK_DIR} --lr 1e30 --max-steps 40 ${flags}
                RESULT_VARIABLE result OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(result EQUAL 0)
  message(FATAL_ERROR "a diverging run exited 0:\n${out}${err}")
endif()
if(NOT err MATCHES "step [0-9]+: the (loss is (-?nan|inf)|trained weights are no longer finite)")
  message(FATAL_ERROR "exit ${result}, but no divergence named:\n${out}${err}")
endif()
if(EXISTS ${WORK_DIR}/${WEIGHTS})
  message(FATAL_ERROR "a diverged run wrote ${WEIGHTS}")
endif()
if(NOT err MATCHES "the last good checkpoint is '([^']*step-0*([0-9]+))'")
  message(FATAL_ERROR "no last good checkpoint named:\n${err}")
endif()
set(good ${CMAKE_MATCH_1})
set(step ${CMAKE_MATCH_2})
execute_process(COMMAND ${TRAIN} --output ${WORK_DIR} --lr 1e30 ${flags} --max-steps ${step} --resume ${good}
                RESULT_VARIABLE result OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(result OR NOT EXISTS ${WORK_DIR}/${WEIGHTS})
  message(FATAL_ERROR "the last good checkpoint ${good} did not resume into ${WEIGHTS} (exit ${result}):\n${out}${err}")
endif()
message(STATUS "stopped as expected; ${good} resumed")
