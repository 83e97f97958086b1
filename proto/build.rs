//! Compiles `sangsaeng/v1/*.proto` with protox (pure Rust, no system `protoc`) and
//! generates prost messages plus tonic clients and servers.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["sangsaeng/v1/federation.proto"];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["."])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // The payload of a transfer chunk as `bytes::Bytes`: a received chunk is
        // a view of tonic's receive buffer rather than a copy of it, and a sent
        // one can share the coordinator's one encoding of the published model
        // or the participant's encoded delta (a retry clones a reference, not
        // a megabyte).
        .bytes(".sangsaeng.v1.ModelChunk.data")
        .bytes(".sangsaeng.v1.UpdateChunk.data")
        // A secure round's ShareKeys step hands every participant every signed
        // advert (the neighbour graph is derived from all of them): K tasks of
        // K adverts. As `Bytes` each task's copy of an advert shares its
        // certificate and keys instead of copying them (at K = 1,000 the copies
        // were most of a 2.8 GB coordinator peak).
        .bytes(".sangsaeng.v1.SignedAdvert")
        .compile_fds(fds)?;
    Ok(())
}
