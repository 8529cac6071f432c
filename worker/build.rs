//! With `--features libtorch`, records where libtorch's shared libraries are, so the worker
//! starts without LD_LIBRARY_PATH.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_LIBTORCH").is_none() {
        return;
    }
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=LIBTORCH_LIB");
    // torch-sys reads the same variables: LIBTORCH_LIB, else LIBTORCH/lib.
    let lib = std::env::var("LIBTORCH_LIB")
        .ok()
        .or_else(|| std::env::var("LIBTORCH").ok())
        .map(|dir| std::path::Path::new(&dir).join("lib"));
    if let Some(lib) = lib {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    }
}
