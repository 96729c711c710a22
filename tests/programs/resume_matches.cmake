# An interrupted run resumed with --resume latest ends with the same tuner weights as an
# uninterrupted one, and with the whole loss history: run A trains STEPS steps; run B trains to
# HALF, then resumes to STEPS.
string(REPLACE "|" ";" EXTRA "${EXTRA}")
set(common_flags --max-steps ${STEPS} --checkpoint-every 5 --log-every 100 --validation-steps 2 ${EXTRA})
file(REMOVE_RECURSE ${WORK_DIR})
execute_process(COMMAND ${TRAIN} --output ${WORK_DIR}/a ${common_flags} RESULT_VARIABLE r1)
execute_process(COMMAND ${TRAIN} --output ${WORK_DIR}/b --max-steps ${HALF} --checkpoint-every 5
                        --log-every 100 --validation-steps 2 ${EXTRA} RESULT_VARIABLE r2)
execute_process(COMMAND ${TRAIN} --output ${WORK_DIR}/b ${common_flags} --resume latest
                RESULT_VARIABLE r3 OUTPUT_VARIABLE out)
if(r1 OR r2 OR r3)
  message(FATAL_ERROR "a training run failed (${r1} ${r2} ${r3})")
endif()
if(NOT out MATCHES "resumed from .*step-0*${HALF} at step ${HALF}")
  message(FATAL_ERROR "the second run did not resume at step ${HALF}:\n${out}")
endif()
foreach(file ${FILES})
  execute_process(COMMAND ${CMAKE_COMMAND} -E compare_files ${WORK_DIR}/a/${file} ${WORK_DIR}/b/${file}
                  RESULT_VARIABLE different)
  if(different)
    message(FATAL_ERROR "${file} differs between the uninterrupted and the resumed run")
  endif()
endforeach()
# loss.csv: every step, the same losses (the time column differs).
foreach(run a b)
  file(STRINGS ${WORK_DIR}/${run}/loss.csv lines)
  set(losses_${run} "")
  foreach(line IN LISTS lines)
    string(REGEX REPLACE ",[^,]*,[^,]*$" "" step_and_loss "${line}")
    list(APPEND losses_${run} "${step_and_loss}")
  endforeach()
endforeach()
list(LENGTH losses_b n)
math(EXPR expected "${STEPS} + 1")
if(NOT n EQUAL expected OR NOT "${losses_a}" STREQUAL "${losses_b}")
  message(FATAL_ERROR "loss.csv of the resumed run (${n} lines) is not the uninterrupted run's:\n"
                      "${losses_b}\nagainst\n${losses_a}")
endif()
