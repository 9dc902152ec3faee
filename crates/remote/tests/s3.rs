//! Against a real S3-compatible server (moto): multipart upload, head, list, range reads,
//! download, the local cache, and an aborted upload leaving no object.

use std::io::Write;

use vsnap_remote::test_server::S3;
use vsnap_remote::{local_copy, Location, Object};

fn object(s3: &S3, url: &str) -> Object {
    match Location::parse_with(url, s3.env()).unwrap() {
        Location::Object(o) => o,
        Location::Local(_) => panic!("{url} is local"),
    }
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 4096) as u8).collect()
}

#[test]
fn objects_go_up_and_come_back_whole() {
    let s3 = S3::start();
    s3.create_bucket("diffs");
    let dir = tempfile::tempdir().unwrap();
    // Three parts and a bit: 8 MiB parts.
    let data = pattern((17 << 20) + 123);
    let src = dir.path().join("gen-1.diff");
    std::fs::File::create(&src)
        .unwrap()
        .write_all(&data)
        .unwrap();

    let vm = object(&s3, "s3://diffs/vm1");
    let o = vm.child("gen-1.diff").unwrap();
    let mut seen = Vec::new();
    let sent = o.upload(&src, &mut |n| seen.push(n)).unwrap();
    assert_eq!(sent, data.len() as u64);
    assert_eq!(seen.last(), Some(&sent));
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "progress grows");

    assert_eq!(o.head().unwrap().size, data.len() as u64);
    let listed = vm.list().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].name, "gen-1.diff");
    let r = (9 << 20) - 5..(9 << 20) + 5000;
    assert_eq!(
        o.read_range(r.clone()).unwrap(),
        data[r.start as usize..r.end as usize]
    );

    let cache = dir.path().join("cache");
    let loc = Location::Object(o.clone());
    let local = local_copy(&loc, &cache, &mut |_| {}).unwrap();
    assert!(std::fs::read(&local).unwrap() == data);
    // Cached: the same file, not fetched again.
    let mut fetched = 0;
    let again = local_copy(&loc, &cache, &mut |n| fetched = n).unwrap();
    assert_eq!((again, fetched), (local, 0));
    // No partial file left behind.
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 1);

    o.delete().unwrap();
    assert!(o.head().is_err());
    assert!(vm.list().unwrap().is_empty());
}

#[test]
fn a_failed_upload_leaves_no_object() {
    let s3 = S3::start();
    s3.create_bucket("diffs");
    let dir = tempfile::tempdir().unwrap();
    // A source that cannot be read (a directory) fails before any part goes up; one that
    // vanishes from a bucket that does not exist fails on the store's side.
    let o = object(&s3, "s3://diffs/x.diff");
    assert!(o.upload(dir.path(), &mut |_| {}).is_err());
    let missing = object(&s3, "s3://no-such-bucket/x.diff");
    let src = dir.path().join("f");
    std::fs::write(&src, pattern(1 << 20)).unwrap();
    assert!(missing.upload(&src, &mut |_| {}).is_err());
    assert!(object(&s3, "s3://diffs").list().unwrap().is_empty());
}
