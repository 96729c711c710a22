# Two ranks started by hand (torchrun's environment) with different --lora-rank: both refuse at
# the start, naming rank 1, rather than training tensors of different shapes. PORT: the
# rendezvous port of this test.
file(REMOVE_RECURSE ${WORK_DIR})
set(world WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=${PORT})
# Two COMMANDs run at the same time (a pipeline); both outputs are collected.
execute_process(COMMAND ${CMAKE_COMMAND} -E env RANK=0 ${world} ${TRAIN} --output ${WORK_DIR}/out --method lora
                        --lora-rank 4 --max-steps 2 --dist-timeout 60
                COMMAND ${CMAKE_COMMAND} -E env RANK=1 ${world} ${TRAIN} --output ${WORK_DIR}/out --method lora
                        --lora-rank 8 --max-steps 2 --dist-timeout 60
                RESULTS_VARIABLE results ERROR_VARIABLE err OUTPUT_QUIET)
list(GET results 0 r0)
list(GET results 1 r1)
if(r0 EQUAL 0 OR r1 EQUAL 0)
  message(FATAL_ERROR "a rank with other flags was not refused (${results}):\n${err}")
endif()
if(NOT err MATCHES "the flags or trainable tensors differ across the 2 processes: rank\\(s\\) 1 do not match rank 0")
  message(FATAL_ERROR "the refusal does not name rank 1:\n${err}")
endif()
if(EXISTS ${WORK_DIR}/out/lora_kohya.safetensors)
  message(FATAL_ERROR "a refused run wrote weights")
endif()
