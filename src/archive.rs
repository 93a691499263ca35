//! A Consul snapshot, checked as Consul checks one before it restores it:
//! a gzip stream of a tar archive holding `meta.json`, `state.bin` and
//! `SHA256SUMS` (lines `<hex>  <name>`), each sum matching, nothing else
//! in the archive and nothing after it. The rules and the wording of the
//! reasons follow hashicorp/consul `snapshot/snapshot.go` (`Read`,
//! `concludeGzipRead`) and `snapshot/archive.go` (`read`,
//! `hashList.DecodeAndVerify`). A snapshot that fails here is one Consul
//! would refuse: `snapshot` uploads none.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::path::Path;

use sha2::{Digest, Sha256};

/// The most `SHA256SUMS` may hold (two lines in Consul's archives).
const MAX_SUMS: u64 = 64 << 10;
/// The most `meta.json` may hold (a few hundred bytes in Consul's).
const MAX_META: u64 = 1 << 20;

/// Checks the snapshot at `path`; the reason Consul would refuse it.
/// Reads the file once, in bounded memory (snapshots run to gigabytes).
pub fn check(path: &Path) -> Result<(), String> {
    let file = std::fs::File::open(path).map_err(|e| format!("opening {}: {e}", path.display()))?;
    check_reader(io::BufReader::with_capacity(1 << 16, file))
}

/// [`check`] on a stream.
pub fn check_reader(input: impl Read) -> Result<(), String> {
    let mut input = io::BufReader::new(input);
    // Go's gzip.NewReader reads the header at once.
    let head = io::BufRead::fill_buf(&mut input)
        .map_err(|e| format!("failed to decompress snapshot: {e}"))?;
    match head {
        [] => return Err("failed to decompress snapshot: EOF".into()),
        [0x1f, 0x8b, ..] | [0x1f] => {}
        _ => return Err("failed to decompress snapshot: gzip: invalid header".into()),
    }
    // Go's gzip reader reads concatenated members as one stream.
    let gz = flate2::read::MultiGzDecoder::new(input);
    let mut archive = tar::Archive::new(gz);
    let mut sums = Vec::new();
    let mut hashes: BTreeMap<&str, Vec<u8>> = BTreeMap::new();
    let failed =
        |e: io::Error| format!("failed to read snapshot file: failed reading snapshot: {e}");
    let entries = archive.entries().map_err(failed)?;
    for entry in entries {
        let mut entry = entry.map_err(failed)?;
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        match name.as_str() {
            "meta.json" => {
                let mut body = Vec::new();
                (&mut entry)
                    .take(MAX_META + 1)
                    .read_to_end(&mut body)
                    .map_err(failed)?;
                if body.len() as u64 > MAX_META {
                    return Err(format!(
                        "failed to read snapshot file: failed to decode snapshot metadata: larger than {MAX_META} bytes"
                    ));
                }
                serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&body)
                    .map_err(|e| {
                        format!(
                            "failed to read snapshot file: failed to decode snapshot metadata: {e}"
                        )
                    })?;
                hashes.insert("meta.json", Sha256::digest(&body).to_vec());
            }
            "state.bin" => {
                let mut hasher = HashWriter(Sha256::new());
                io::copy(&mut entry, &mut hasher).map_err(|e| {
                    format!(
                        "failed to read snapshot file: failed to read or write snapshot data: {e}"
                    )
                })?;
                hashes.insert("state.bin", hasher.0.finalize().to_vec());
            }
            "SHA256SUMS" => {
                sums.clear();
                (&mut entry)
                    .take(MAX_SUMS + 1)
                    .read_to_end(&mut sums)
                    .map_err(|e| {
                        format!("failed to read snapshot file: failed to read snapshot hashes: {e}")
                    })?;
                if sums.len() as u64 > MAX_SUMS {
                    return Err(format!(
                        "failed to read snapshot file: failed to read snapshot hashes: larger than {MAX_SUMS} bytes"
                    ));
                }
            }
            other => {
                return Err(format!(
                    "failed to read snapshot file: unexpected file {other:?} in snapshot"
                ));
            }
        }
    }
    verify_sums(&sums, &hashes).map_err(|why| {
        format!("failed to read snapshot file: failed checking integrity of snapshot: {why}")
    })?;
    // The tar reader stopped at the first of the two zero blocks that end
    // an archive; Go's reads the second too, then the gzip stream must be
    // at its end.
    let mut rest = archive.into_inner();
    let mut block = [0u8; 512];
    let got = read_full(&mut rest, &mut block)
        .map_err(|e| format!("failed to read snapshot file: failed reading snapshot: {e}"))?;
    if got != 0 && got != block.len() {
        return Err("failed to read snapshot file: failed reading snapshot: unexpected EOF".into());
    }
    if block[..got].iter().any(|b| *b != 0) {
        return Err(
            "failed to read snapshot file: failed reading snapshot: archive/tar: invalid tar header"
                .into(),
        );
    }
    let left = io::copy(&mut rest, &mut io::sink()).map_err(|e| e.to_string())?;
    if left != 0 {
        return Err(format!("{left} unread uncompressed bytes remain"));
    }
    Ok(())
}

/// Reads until `buf` is full or the stream ends; how much was read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..])? {
            0 => break,
            n => got += n,
        }
    }
    Ok(got)
}

/// `SHA256SUMS` against the hashes of the files read: each expected file
/// named, with a matching sum.
fn verify_sums(sums: &[u8], hashes: &BTreeMap<&str, Vec<u8>>) -> Result<(), String> {
    let text = std::str::from_utf8(sums).map_err(|_| "SHA256SUMS is not text".to_string())?;
    let mut seen: BTreeMap<&str, Vec<u8>> = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let parsed = line
            .split_once("  ")
            .and_then(|(hex, file)| Some((decode_hex(hex)?, file.trim())));
        let Some((sum, file)) = parsed else {
            return Err(format!(
                "line {} of SHA256SUMS is not `<sha256>  <file>`",
                n + 1
            ));
        };
        seen.insert(file, sum);
    }
    for file in ["meta.json", "state.bin"] {
        let Some(sum) = seen.get(file) else {
            return Err(format!("file missing for {file:?}"));
        };
        if hashes.get(file) != Some(sum) {
            return Err(format!("hash check failed for {file:?}"));
        }
    }
    Ok(())
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

struct HashWriter(Sha256);

impl Write for HashWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An archive as Consul's `snapshot.Write` makes one: the three files,
    /// the tar's two end blocks, gzip.
    fn archive(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut tar = tar::Builder::new(Vec::new());
        for (name, body) in files {
            let mut h = tar::Header::new_ustar();
            h.set_size(body.len() as u64);
            h.set_mode(0o600);
            h.set_cksum();
            tar.append_data(&mut h, name, *body).unwrap();
        }
        let raw = tar.into_inner().unwrap();
        gzip(&raw)
    }

    fn gzip(raw: &[u8]) -> Vec<u8> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(raw).unwrap();
        gz.finish().unwrap()
    }

    fn sums(meta: &[u8], state: &[u8]) -> String {
        let hex = |b: &[u8]| crate::spool::hex(&Sha256::digest(b));
        format!("{}  meta.json\n{}  state.bin\n", hex(meta), hex(state))
    }

    const META: &[u8] = br#"{"ID":"2-42-1700000000000","Size":5,"Index":42,"Term":2,"Version":1}"#;

    #[test]
    fn consuls_archive_passes_and_each_flaw_is_named_as_consul_names_it() {
        let state = b"state";
        let good = archive(&[
            ("meta.json", META),
            ("state.bin", state),
            ("SHA256SUMS", sums(META, state).as_bytes()),
        ]);
        check_reader(&good[..]).unwrap();

        let cut = &good[..good.len() / 2];
        let err = check_reader(cut).unwrap_err();
        assert!(err.starts_with("failed to read snapshot file"), "{err}");

        let mut streamed = good.clone();
        streamed.extend_from_slice(b"failed to stream snapshot: leadership lost");
        assert!(check_reader(&streamed[..]).is_err());

        let tampered = archive(&[
            ("meta.json", META),
            ("state.bin", b"STATE"),
            ("SHA256SUMS", sums(META, state).as_bytes()),
        ]);
        assert_eq!(
            check_reader(&tampered[..]).unwrap_err(),
            "failed to read snapshot file: failed checking integrity of snapshot: hash check failed for \"state.bin\""
        );

        let missing = archive(&[("meta.json", META), ("state.bin", state)]);
        assert_eq!(
            check_reader(&missing[..]).unwrap_err(),
            "failed to read snapshot file: failed checking integrity of snapshot: file missing for \"meta.json\""
        );

        let extra = archive(&[
            ("meta.json", META),
            ("notes.txt", b"hi"),
            ("state.bin", state),
        ]);
        assert_eq!(
            check_reader(&extra[..]).unwrap_err(),
            "failed to read snapshot file: unexpected file \"notes.txt\" in snapshot"
        );

        // Bytes after the archive's end, inside the gzip stream.
        let mut tar = tar::Builder::new(Vec::new());
        for (name, body) in [
            ("meta.json", META),
            ("state.bin", &state[..]),
            ("SHA256SUMS", sums(META, state).as_bytes()),
        ] {
            let mut h = tar::Header::new_ustar();
            h.set_size(body.len() as u64);
            h.set_cksum();
            tar.append_data(&mut h, name, body).unwrap();
        }
        let mut raw = tar.into_inner().unwrap();
        raw.extend_from_slice(&[0u8; 100]);
        assert_eq!(
            check_reader(&gzip(&raw)[..]).unwrap_err(),
            "100 unread uncompressed bytes remain"
        );

        let err = check_reader(&b"not gzip at all"[..]).unwrap_err();
        assert!(err.starts_with("failed to decompress snapshot"), "{err}");
    }
}
