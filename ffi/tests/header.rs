//! `include/ferry.h` is what cbindgen makes of `src/lib.rs`: this test fails when it is stale.
//! `FERRY_BLESS=1 cargo test -p ferry-ffi --test header` (scripts/gen-header.sh) rewrites it.

#[test]
fn checked_in_header_is_current() {
    let dir = env!("CARGO_MANIFEST_DIR");
    let config = cbindgen::Config::from_file(format!("{dir}/cbindgen.toml")).expect("cbindgen.toml");
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_crate(dir)
        .with_config(config)
        .generate()
        .expect("cbindgen parses ffi/src/lib.rs")
        .write(&mut generated);
    let path = format!("{dir}/include/ferry.h");
    if std::env::var_os("FERRY_BLESS").is_some() {
        std::fs::write(&path, &generated).expect("write ferry.h");
        return;
    }
    let checked_in = std::fs::read(&path).unwrap_or_default();
    assert!(checked_in == generated, "ffi/include/ferry.h is stale: run scripts/gen-header.sh and commit the result");
}
