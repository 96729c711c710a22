# One writer per output folder, and SIGINT saves: while run A trains, run B into the same folder
# is refused naming A's pid; SIGINT then stops A after its current step with a checkpoint there
# and exit status 130, and --resume latest continues from it. A step that accumulates many
# micro-batches is not waited for: SIGTERM in its midst saves the steps before it and exits 143.
file(REMOVE_RECURSE ${WORK_DIR})
file(MAKE_DIRECTORY ${WORK_DIR})
set(out_dir ${WORK_DIR}/out)
# A shell function: wait_for PID LOG TEXT waits (up to 5 min) until LOG holds TEXT, and kills PID
# and exits 3 if it ends or never gets there.
set(wait_for "wait_for() {
  i=0
  while ! grep -q \"$3\" \"$2\"; do
    sleep 0.2; i=$((i + 1))
    if [ $i -gt 1500 ] || ! kill -0 $1 2>/dev/null; then kill -9 $1 2>/dev/null; echo \"no '$3' in $2\"; exit 3; fi
  done
}")
set(script "${wait_for}
${TRAIN} --output ${out_dir} --max-steps 100000 --checkpoint-every 0 --log-every 1 > ${WORK_DIR}/a.log 2>&1 &
pid=$!
wait_for $pid ${WORK_DIR}/a.log 'step 3/'
${TRAIN} --output ${out_dir} --max-steps 5 > ${WORK_DIR}/b.log 2>&1
echo \"B exit $?\"
kill -INT $pid
wait $pid
echo \"A exit $?\"
")
execute_process(COMMAND sh -c "${script}" OUTPUT_VARIABLE out ERROR_VARIABLE err)
file(READ ${WORK_DIR}/a.log a_log)
file(READ ${WORK_DIR}/b.log b_log)
if(NOT out MATCHES "B exit 1" OR NOT b_log MATCHES "is in use by another run \\(pid [0-9]+ on ")
  message(FATAL_ERROR "the second writer was not refused:\n${out}${err}\n${b_log}")
endif()
if(NOT out MATCHES "A exit 130" OR NOT a_log MATCHES "stopped by SIGINT after step ([0-9]+) of 100000: checkpoint '")
  message(FATAL_ERROR "SIGINT did not stop run A with a checkpoint:\n${out}${err}\n${a_log}")
endif()
set(step ${CMAKE_MATCH_1})
math(EXPR more "${step} + 1")
execute_process(COMMAND ${TRAIN} --output ${out_dir} --max-steps ${more} --resume latest --log-every 1
                RESULT_VARIABLE result OUTPUT_VARIABLE resumed ERROR_VARIABLE resumed_err)
if(result OR NOT resumed MATCHES "resumed from .*step-0*${step} at step ${step}")
  message(FATAL_ERROR "no resume from the signal's checkpoint (exit ${result}):\n${resumed}${resumed_err}")
endif()

set(script "${wait_for}
${TRAIN} --output ${WORK_DIR}/long --max-steps 3 --grad-accum 200 --checkpoint-every 0 --log-every 1 > ${WORK_DIR}/long.log 2>&1 &
pid=$!
wait_for $pid ${WORK_DIR}/long.log 'step 1/'
kill -TERM $pid
wait $pid
echo \"long exit $?\"
")
execute_process(COMMAND sh -c "${script}" OUTPUT_VARIABLE out ERROR_VARIABLE err)
file(READ ${WORK_DIR}/long.log long_log)
if(NOT out MATCHES "long exit 143" OR NOT long_log MATCHES "stopped by SIGTERM after step 1 of 3: checkpoint '[^']*step-0*1'")
  message(FATAL_ERROR "SIGTERM during step 2's accumulation did not stop it with step 1 saved:\n${out}${err}\n${long_log}")
endif()
message(STATUS "refused a second writer; SIGINT saved step ${step}; resumed; SIGTERM stopped an accumulation")
