# Writes build_info.h with the current git commit. Run at every build (not only at configure
# time) so the commit in `loraserve_build_info` and GetModelInfo is never stale; configure_file
# leaves the header untouched when nothing changed, so nothing recompiles needlessly.
#   cmake -DSOURCE_DIR=... -DINPUT=... -DOUTPUT=... -DPROJECT_VERSION=... -DCMAKE_BUILD_TYPE=...
#         -DLS_HAVE_CUDA_BOOL=true|false -P build_info.cmake
execute_process(
  COMMAND git rev-parse --short=12 HEAD
  WORKING_DIRECTORY ${SOURCE_DIR}
  OUTPUT_VARIABLE LS_GIT_COMMIT
  OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
if(NOT LS_GIT_COMMIT)
  set(LS_GIT_COMMIT "unknown")
endif()
configure_file(${INPUT} ${OUTPUT} @ONLY)
