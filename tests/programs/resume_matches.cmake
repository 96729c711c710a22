# An interrupted run resumed with --resume latest ends with the same tuner weights as an
# uninterrupted one, and with the whole loss history: run A trains STEPS steps; run B trains to
# HALF, then resumes to STEPS. RESUME_EXTRA (default: EXTRA) are the resumed run's own flags: a
# checkpoint of two processes at --batch-size 2 resumes on one at --batch-size 2 --grad-accum 2
# (the same global batch, the same samples and noise: the same weights), and a resume with another
# global batch is refused.
string(REPLACE "|" ";" EXTRA "${EXTRA}")
string(REPLACE "|" ";" FILES "${FILES}")
if(NOT DEFINED RESUME_EXTRA)
  set(RESUME_EXTRA "${EXTRA}")
endif()
string(REPLACE "|" ";" RESUME_EXTRA "${RESUME_EXTRA}")
set(shared_flags --checkpoint-every 5 --log-every 100 --validation-steps 2)
file(REMOVE_RECURSE ${WORK_DIR})
execute_process(COMMAND ${TRAIN} --output ${WORK_DIR}/a --max-steps ${STEPS} ${shared_flags} ${EXTRA}
                RESULT_VARIABLE r1)
execute_process(COMMAND ${TRAIN} --output ${WORK_DIR}/b --max-steps ${HALF} ${shared_flags} ${EXTRA}
                RESULT_VARIABLE r2)
if(NOT "${RESUME_EXTRA}" STREQUAL "${EXTRA}")
  execute_process(COMMAND ${TRAIN} --output ${WORK_DIR}/b --max-steps ${STEPS} ${shared_flags} --resume latest
                          --batch-size 1
                  RESULT_VARIABLE refused ERROR_VARIABLE refusal OUTPUT_QUIET)
  if(NOT refused OR NOT refusal MATCHES "trained with a global batch of 4 \\(2 processes × batch 2 × accumulation 1\\); this run's is 1")
    message(FATAL_ERROR "a resume with another global batch was not refused (${refused}):\n${refusal}")
  endif()
endif()
execute_process(COMMAND ${TRAIN} --output ${WORK_DIR}/b --max-steps ${STEPS} ${shared_flags} ${RESUME_EXTRA}
                        --resume latest
                RESULT_VARIABLE r3 OUTPUT_VARIABLE out)
if(r1 OR r2 OR r3)
  message(FATAL_ERROR "a training run failed (${r1} ${r2} ${r3})")
endif()
if(NOT out MATCHES "resumed from .*step-0*${HALF} at step ${HALF}")
  message(FATAL_ERROR "the second run did not resume at step ${HALF}:\n${out}")
endif()
if(out MATCHES "resuming with other settings")
  message(FATAL_ERROR "a resume with the same settings says they changed:\n${out}")
endif()
foreach(file ${FILES})
  execute_process(COMMAND ${CMAKE_COMMAND} -E compare_files ${WORK_DIR}/a/${file} ${WORK_DIR}/b/${file}
                  RESULT_VARIABLE different)
  if(different)
    message(FATAL_ERROR "${file} differs between the uninterrupted and the resumed run")
  endif()
endforeach()
# loss.csv: every step, the same losses (the time column differs). After a resume on another
# layout, the steps before it: the mean loss of a step sums in another order (across processes in
# float64, within one in float32), which may change its last digits.
foreach(run a b)
  file(STRINGS ${WORK_DIR}/${run}/loss.csv lines)
  set(losses_${run} "")
  foreach(line IN LISTS lines)
    string(REGEX REPLACE ",[^,]*,[^,]*$" "" step_and_loss "${line}")
    string(REGEX MATCH "^[0-9]+" step "${step_and_loss}")
    if(NOT "${RESUME_EXTRA}" STREQUAL "${EXTRA}" AND step AND step GREATER ${HALF})
      string(REGEX REPLACE ",.*" "" step_and_loss "${step_and_loss}")
    endif()
    list(APPEND losses_${run} "${step_and_loss}")
  endforeach()
endforeach()
list(LENGTH losses_b n)
math(EXPR expected "${STEPS} + 1")
if(NOT n EQUAL expected OR NOT "${losses_a}" STREQUAL "${losses_b}")
  message(FATAL_ERROR "loss.csv of the resumed run (${n} lines) is not the uninterrupted run's:\n"
                      "${losses_b}\nagainst\n${losses_a}")
endif()
# validation.json (train_control): every measurement of the uninterrupted run is in the resumed
# run's history too, with the same losses — including those made before the resume.
if(EXISTS ${WORK_DIR}/a/validation.json)
  file(READ ${WORK_DIR}/a/validation.json a_json)
  file(READ ${WORK_DIR}/b/validation.json b_json)
  string(JSON a_count LENGTH "${a_json}")
  string(JSON b_count LENGTH "${b_json}")
  math(EXPR a_last "${a_count} - 1")
  math(EXPR b_last "${b_count} - 1")
  foreach(i RANGE ${a_last})
    string(JSON step GET "${a_json}" ${i} step)
    string(JSON matched GET "${a_json}" ${i} loss_matched)
    set(found OFF)
    foreach(j RANGE ${b_last})
      string(JSON b_step GET "${b_json}" ${j} step)
      string(JSON b_matched GET "${b_json}" ${j} loss_matched)
      if(b_step EQUAL step AND b_matched STREQUAL matched)
        set(found ON)
      endif()
    endforeach()
    if(NOT found)
      message(FATAL_ERROR "validation.json of the resumed run lacks step ${step} (loss ${matched}):\n${b_json}")
    endif()
  endforeach()
endif()
# A resume may change the learning rate: it says so, naming the flag and both values.
math(EXPR longer "${STEPS} + 1")
execute_process(COMMAND ${TRAIN} --output ${WORK_DIR}/b --max-steps ${longer} ${shared_flags} ${RESUME_EXTRA}
                        --resume latest --lr 0.000123
                RESULT_VARIABLE r4 OUTPUT_VARIABLE out)
if(r4 OR NOT out MATCHES "resuming with other settings: --lr [0-9.e-]+ then, 0.000123 now")
  message(FATAL_ERROR "a resume with another --lr (${r4}) did not say so:\n${out}")
endif()
