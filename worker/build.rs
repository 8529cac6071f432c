//! With `--features libtorch`: the worker's binaries (and test binaries) find libtorch's
//! shared libraries through an rpath, so they start without LD_LIBRARY_PATH. The model crate's
//! build script compiles the C++ shim and links libtorch, but a link argument reaches only the
//! binaries of the crate whose build script gives it.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_LIBTORCH").is_none() {
        return;
    }
    for var in ["LIBTORCH", "LIBTORCH_LIB"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    // torch-sys's lookup: LIBTORCH_LIB, else LIBTORCH (effnet's build script has already
    // failed with instructions if neither is set).
    if let Some(root) = std::env::var_os("LIBTORCH_LIB").or_else(|| std::env::var_os("LIBTORCH")) {
        let lib = std::path::Path::new(&root).join("lib");
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    }
}
