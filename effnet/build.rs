//! With `--features libtorch`: compiles the C++ shim over libtorch (csrc/aten_ops.cpp) and
//! records where libtorch's shared libraries are, so this crate's tests and examples start
//! without LD_LIBRARY_PATH; it passes the directory on as `lib_dir` (see `links` in Cargo.toml),
//! from which worker/build.rs gives the worker's binaries the same rpath.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "libtorch")]
    libtorch::build();
}

#[cfg(feature = "libtorch")]
mod libtorch {
    use std::path::PathBuf;

    pub fn build() {
        println!("cargo:rerun-if-changed=csrc/aten_ops.cpp");
        for var in [
            "LIBTORCH",
            "LIBTORCH_INCLUDE",
            "LIBTORCH_LIB",
            "LIBTORCH_CXX11_ABI",
        ] {
            println!("cargo:rerun-if-env-changed={var}");
        }
        // The variables torch-sys reads: LIBTORCH_INCLUDE and LIBTORCH_LIB, else LIBTORCH.
        let root = std::env::var_os("LIBTORCH").map(PathBuf::from);
        let dir = |var: &str| std::env::var_os(var).map(PathBuf::from).or_else(|| root.clone());
        let (Some(include), Some(lib)) = (dir("LIBTORCH_INCLUDE"), dir("LIBTORCH_LIB")) else {
            panic!(
                "the libtorch feature needs LIBTORCH set to a libtorch 2.9.0 directory (include/ \
                 and lib/); `python3 worker/scripts/fetch_libtorch.py` fetches one and prints \
                 the export line"
            );
        };
        let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
        cc::Build::new()
            .cpp(true)
            .file("csrc/aten_ops.cpp")
            .include(include.join("include"))
            .flag("-std=c++17")
            .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
            .flag("-DGLOG_USE_GLOG_EXPORT")
            .warnings(false)
            .compile("effnet_aten_ops");
        let lib = lib.join("lib");
        println!("cargo:rustc-link-search=native={}", lib.display());
        // After the shim in link order, which needs them.
        println!("cargo:rustc-link-lib=dylib=torch_cpu");
        println!("cargo:rustc-link-lib=dylib=c10");
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
        // For the build scripts of crates that depend on this one (`links` in Cargo.toml):
        // their binaries need the same rpath, and this lookup stays the only one.
        println!("cargo:lib_dir={}", lib.display());
    }
}
