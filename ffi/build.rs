// The shared library's soname, so programs linked against the installed libferry.so record
// libferry.so.1 (scripts/install-c.sh installs both names).
fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libferry.so.1");
}
