//! With `--features libtorch`: the worker's binaries (and test binaries) find libtorch's
//! shared libraries through an rpath, so they start without LD_LIBRARY_PATH. The model crate's
//! build script compiles the C++ shim and links libtorch, but a link argument reaches only the
//! binaries of the crate whose build script gives it; it passes the library directory on
//! (`DEP_EFFNET_ATEN_OPS_LIB_DIR`, through its `links` key).

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=DEP_EFFNET_ATEN_OPS_LIB_DIR");
    if std::env::var_os("CARGO_FEATURE_LIBTORCH").is_none() {
        return;
    }
    if let Some(lib) = std::env::var_os("DEP_EFFNET_ATEN_OPS_LIB_DIR") {
        let lib = std::path::Path::new(&lib);
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    }
}
