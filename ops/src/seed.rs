//! Independent random streams of one stage: every op that draws randomness derives its
//! streams here, so no two purposes share draws and no op family depends on another for it.

/// An independent stream of randomness for one purpose of one stage (SplitMix64 of the stage
/// seed and a stream number), so that e.g. weight init and shuffling do not share draws.
pub fn derive_seed(seed: u64, stream: u64) -> u64 {
    let mut z = seed
        .wrapping_add(stream.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
