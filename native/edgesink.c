// The patch marker declared in include/edgesink.h; compiled into libllama by CMakeLists.txt.

#include "edgesink.h"

#ifndef EDGESINK_PATCH_LEVEL
#    error "EDGESINK_PATCH_LEVEL must be defined by the build"
#endif

#ifndef EDGESINK_UPSTREAM_COMMIT
#    error "EDGESINK_UPSTREAM_COMMIT must be defined by the build"
#endif

int32_t edgesink_patch_level(void) {
    return EDGESINK_PATCH_LEVEL;
}

const char * edgesink_upstream_commit(void) {
    return EDGESINK_UPSTREAM_COMMIT;
}
