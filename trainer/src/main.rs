fn main() {
    let d = ferroclip::device::select(0, false);
    eprintln!("device: {d:?}");
}
