# Two ranks started by hand (torchrun's environment) that disagree are both refused at the start,
# naming rank 1, rather than training apart or waiting on each other: other --lora-rank (tensors
# of other shapes); demo data on rank 0 and --data on rank 1 (rank 0 writes the demo data while
# rank 1 would wait for it); --data folders that differ in one caption. PORT: the rendezvous port
# of this test.
file(REMOVE_RECURSE ${WORK_DIR})
set(world WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=${PORT})
set(common_flags --max-steps 2 --dist-timeout 60)

# Runs rank 0 with `rank0` and rank 1 with `rank1` (;-lists of flags) into ${WORK_DIR}/`name`;
# both must fail, the errors match `expected`, and no weights may be written.
function(expect_refused name rank0 rank1 expected)
  # Two COMMANDs run at the same time (a pipeline); both outputs are collected.
  execute_process(COMMAND ${CMAKE_COMMAND} -E env RANK=0 ${world} ${TRAIN} --output ${WORK_DIR}/${name} ${common_flags} ${rank0}
                  COMMAND ${CMAKE_COMMAND} -E env RANK=1 ${world} ${TRAIN} --output ${WORK_DIR}/${name} ${common_flags} ${rank1}
                  RESULTS_VARIABLE results ERROR_VARIABLE err OUTPUT_QUIET)
  list(GET results 0 r0)
  list(GET results 1 r1)
  if(r0 EQUAL 0 OR r1 EQUAL 0)
    message(FATAL_ERROR "${name}: a rank with other flags was not refused (${results}):\n${err}")
  endif()
  if(NOT err MATCHES "${expected} differ across the 2 processes: rank\\(s\\) 1 do not match rank 0")
    message(FATAL_ERROR "${name}: the refusal does not name rank 1:\n${err}")
  endif()
  file(GLOB written ${WORK_DIR}/${name}/*.safetensors)
  if(written)
    message(FATAL_ERROR "${name}: a refused run wrote weights: ${written}")
  endif()
endfunction()

expect_refused(lora_rank "--method;lora;--lora-rank;4" "--method;lora;--lora-rank;8" "the trainable tensors")
file(MAKE_DIRECTORY ${WORK_DIR}/folder)
expect_refused(demo_or_folder "" "--data;${WORK_DIR}/folder" "the data and model flags")

# Two copies of the demo data, the captions of the second changed.
execute_process(COMMAND ${TRAIN} --output ${WORK_DIR}/demo --max-steps 1 RESULT_VARIABLE made OUTPUT_QUIET)
if(NOT made EQUAL 0)
  message(FATAL_ERROR "the run that writes the demo data failed (${made})")
endif()
file(COPY ${WORK_DIR}/demo/demo_data/ DESTINATION ${WORK_DIR}/other_data)
file(READ ${WORK_DIR}/other_data/metadata.jsonl listing)
string(REPLACE "\"text\":\"a " "\"text\":\"one " changed "${listing}")
if(changed STREQUAL listing)
  message(FATAL_ERROR "no caption starting with \"a \" in ${WORK_DIR}/demo/demo_data/metadata.jsonl")
endif()
file(WRITE ${WORK_DIR}/other_data/metadata.jsonl "${changed}")
expect_refused(data "--data;${WORK_DIR}/demo/demo_data" "--data;${WORK_DIR}/other_data" "the data \\(samples and captions\\)")
