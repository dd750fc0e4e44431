// edgesink.h - what edgesink adds to libllama.
//
// These symbols are compiled into libllama only when edgesink's patches are applied
// (CMake option EDGESINK_PATCHES, on by default). A stock libllama does not export them,
// which is how a caller tells the two apart: look the symbol up before calling it.

#ifndef EDGESINK_H
#define EDGESINK_H

#include <stddef.h>
#include <stdint.h>

#ifdef _WIN32
#    ifdef EDGESINK_BUILD
#        define EDGESINK_API __declspec(dllexport)
#    else
#        define EDGESINK_API __declspec(dllimport)
#    endif
#else
#    define EDGESINK_API __attribute__ ((visibility ("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

    //
    // Patch marker
    //

    // Number of edgesink patches (native/patches/NNNN-*.patch) applied to this build.
    // Always >= 1 where the symbol exists. Level 1 means the K-shift rotates only the
    // range of cells with a non-zero pending shift instead of the whole cache.
    EDGESINK_API int32_t edgesink_patch_level(void);

    // The upstream llama.cpp commit this library was built from, as a short hash
    // (e.g. "0c1e57098"). The returned string is static; do not free it.
    EDGESINK_API const char * edgesink_upstream_commit(void);

    //
    // Build facts, for a caller's check that it talks to the library it expects
    //

    // sizeof() of a struct of llama.h as this library was compiled: "llama_model_params",
    // "llama_context_params" or "llama_batch". Returns 0 for any other name (or NULL).
    // A binding whose own declaration has another size would pass or read it wrongly.
    EDGESINK_API size_t edgesink_struct_size(const char * name);

    // The ggml commit this libllama was built against, as that ggml's ggml_commit() reports it
    // (e.g. "d704cea"). A loaded libggml reporting another commit comes from another build.
    // The returned string is static; do not free it.
    EDGESINK_API const char * edgesink_ggml_commit(void);

#ifdef __cplusplus
}
#endif

#endif // EDGESINK_H
