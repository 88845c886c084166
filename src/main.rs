fn main() {
    println!("stead {}", env!("CARGO_PKG_VERSION"));
}
