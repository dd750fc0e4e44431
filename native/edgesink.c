// The patch marker and build facts declared in include/edgesink.h; compiled into libllama by CMakeLists.txt.

#include "edgesink.h"

#include <string.h>

#include "llama.h"

#ifndef EDGESINK_PATCH_LEVEL
#    error "EDGESINK_PATCH_LEVEL must be defined by the build"
#endif

#ifndef EDGESINK_UPSTREAM_COMMIT
#    error "EDGESINK_UPSTREAM_COMMIT must be defined by the build"
#endif

#ifndef EDGESINK_GGML_COMMIT
#    error "EDGESINK_GGML_COMMIT must be defined by the build"
#endif

int32_t edgesink_patch_level(void) {
    return EDGESINK_PATCH_LEVEL;
}

const char * edgesink_upstream_commit(void) {
    return EDGESINK_UPSTREAM_COMMIT;
}

size_t edgesink_struct_size(const char * name) {
    if (name == NULL) {
        return 0;
    }
    if (strcmp(name, "llama_model_params") == 0) {
        return sizeof(struct llama_model_params);
    }
    if (strcmp(name, "llama_context_params") == 0) {
        return sizeof(struct llama_context_params);
    }
    if (strcmp(name, "llama_batch") == 0) {
        return sizeof(struct llama_batch);
    }
    return 0;
}

const char * edgesink_ggml_commit(void) {
    return EDGESINK_GGML_COMMIT;
}
