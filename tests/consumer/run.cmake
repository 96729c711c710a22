# Installs scedit from BUILD_DIR into a scratch prefix, builds tests/consumer against it with
# find_package(scedit), and runs it. Torch_DIR and nlohmann_json_DIR, where given, are the parent
# build's: the consumer then finds the same LibTorch and JSON library, wherever they came from
# (e.g. a pip LibTorch found through CMAKE_PREFIX_PATH).
set(prefix ${WORK_DIR}/prefix)
file(REMOVE_RECURSE ${WORK_DIR})
execute_process(COMMAND ${CMAKE_COMMAND} --install ${BUILD_DIR} --prefix ${prefix}
                RESULT_VARIABLE result)
if(result)
  message(FATAL_ERROR "install failed")
endif()
set(dependencies)
foreach(variable Torch_DIR nlohmann_json_DIR)
  if(${variable})
    list(APPEND dependencies -D${variable}=${${variable}})
  endif()
endforeach()
execute_process(COMMAND ${CMAKE_COMMAND} -S ${SOURCE_DIR}/tests/consumer -B ${WORK_DIR}/build
                        -DCMAKE_PREFIX_PATH=${prefix} -DCMAKE_BUILD_TYPE=Release ${dependencies}
                RESULT_VARIABLE result)
if(result)
  message(FATAL_ERROR "configuring the consumer with find_package(scedit) failed")
endif()
execute_process(COMMAND ${CMAKE_COMMAND} --build ${WORK_DIR}/build RESULT_VARIABLE result)
if(result)
  message(FATAL_ERROR "building the consumer failed")
endif()
execute_process(COMMAND ${WORK_DIR}/build/consumer RESULT_VARIABLE result)
if(result)
  message(FATAL_ERROR "the consumer failed")
endif()
