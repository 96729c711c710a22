# One writer per output folder, and SIGINT saves: while run A trains, run B into the same folder
# is refused naming A's pid; SIGINT then stops A after its current step with a checkpoint there
# and exit status 130, and --resume latest continues from it.
file(REMOVE_RECURSE ${WORK_DIR})
file(MAKE_DIRECTORY ${WORK_DIR})
set(out_dir ${WORK_DIR}/out)
set(script "
${TRAIN} --output ${out_dir} --max-steps 100000 --checkpoint-every 0 --log-every 1 > ${WORK_DIR}/a.log 2>&1 &
pid=$!
i=0
while ! grep -q 'step 3/' ${WORK_DIR}/a.log; do
  sleep 0.2; i=$((i + 1))
  if [ $i -gt 1500 ] || ! kill -0 $pid 2>/dev/null; then kill -9 $pid 2>/dev/null; echo 'run A never reached step 3'; exit 3; fi
done
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
message(STATUS "refused a second writer; SIGINT saved step ${step}; resumed")
