# Runs COMMAND (arguments separated by |) and passes when it exits non-zero with output matching
# REGEX; with BEFORE, only when the output does not reach BEFORE (e.g. the line that says the
# model is loading: the refusal came first, and no weights were read).
string(REPLACE "|" ";" COMMAND "${COMMAND}")
execute_process(COMMAND ${COMMAND} RESULT_VARIABLE result OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(result EQUAL 0)
  message(FATAL_ERROR "expected a failure, but the command succeeded:\n${out}${err}")
endif()
if(NOT "${out}${err}" MATCHES "${REGEX}")
  message(FATAL_ERROR "exit code ${result}, but the message does not match '${REGEX}':\n${out}${err}")
endif()
if(BEFORE AND "${out}${err}" MATCHES "${BEFORE}")
  message(FATAL_ERROR "refused, but only after '${BEFORE}':\n${out}${err}")
endif()
message(STATUS "failed as expected (exit ${result}): ${err}")
