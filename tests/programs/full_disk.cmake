# A disk that fills mid-run: the run stops with one line naming the file that could not be
# written and what the system said, leaves no unfinished temporaries, and every checkpoint it
# kept resumes. The small disk is a tmpfs of SIZE_KB KiB mounted in a private mount namespace
# (unshare -m); where that is not allowed the test reports SKIPPED.
file(REMOVE_RECURSE ${WORK_DIR})
file(MAKE_DIRECTORY ${WORK_DIR}/disk ${WORK_DIR}/copy)
set(unshare "")
foreach(candidate "unshare;-m" "unshare;-rm")
  execute_process(COMMAND ${candidate} sh -c "mount -t tmpfs -o size=64k tmpfs ${WORK_DIR}/disk"
                  RESULT_VARIABLE failed OUTPUT_QUIET ERROR_QUIET)
  if(NOT failed)
    set(unshare ${candidate})
    break()
  endif()
endforeach()
if(NOT unshare)
  message(STATUS "SKIPPED: this machine lets no test mount a small file system (unshare -m)")
  return()
endif()
set(script "
mount -t tmpfs -o size=${SIZE_KB}k tmpfs ${WORK_DIR}/disk || exit 90
${TRAIN} --output ${WORK_DIR}/disk/out --max-steps 1000 --checkpoint-every 1 --keep-last 0 --log-every 1000 \
  --validation-steps 1 > ${WORK_DIR}/run.log 2> ${WORK_DIR}/run.err
echo \"exit $?\"
cp -a ${WORK_DIR}/disk/out ${WORK_DIR}/copy/
")
execute_process(COMMAND ${unshare} sh -c "${script}" OUTPUT_VARIABLE out ERROR_VARIABLE err)
file(READ ${WORK_DIR}/run.log log)
file(STRINGS ${WORK_DIR}/run.err errors)
list(LENGTH errors lines)
if(NOT out MATCHES "exit 1" OR NOT lines EQUAL 1 OR NOT errors MATCHES "No space left on device")
  message(FATAL_ERROR "expected one line about the full disk and exit 1, got:\n${out}${err}\n${log}\n${errors}")
endif()
set(kept ${WORK_DIR}/copy/out)
file(GLOB_RECURSE everything LIST_DIRECTORIES true ${kept}/*)
set(leftovers ${everything})
list(FILTER leftovers INCLUDE REGEX "/[^/]*\\.tmp[-.][^/]*$")
if(leftovers)
  message(FATAL_ERROR "unfinished temporaries left behind: ${leftovers}")
endif()
file(GLOB checkpoints ${kept}/checkpoints/step-*)
list(LENGTH checkpoints count)
if(count EQUAL 0)
  message(FATAL_ERROR "no checkpoint fitted before the disk filled: make SIZE_KB larger\n${log}")
endif()
list(SORT checkpoints)
list(GET checkpoints -1 newest)
string(REGEX MATCH "[0-9]+$" step "${newest}")
math(EXPR step "${step}")
execute_process(COMMAND ${TRAIN} --output ${kept} --resume latest --max-steps ${step} --validation-steps 1
                RESULT_VARIABLE result OUTPUT_VARIABLE resumed ERROR_VARIABLE resumed_err)
if(result OR NOT resumed MATCHES "resumed from .* at step ${step}")
  message(FATAL_ERROR "the newest kept checkpoint does not resume (exit ${result}):\n${resumed}${resumed_err}")
endif()
message(STATUS "the full disk stopped the run at one line (${errors}); ${count} checkpoints kept, the newest resumes")
