//! Token mint and verify throughput (DESIGN §3): `cargo bench -p cmg-bench --bench tokens`.

use cmg_bench::{DEVICE_THUMBPRINT, TokenFixture};
use cmg_pki::KeyAlgorithm;
use cmg_token::Revocations;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;

const NOW: i64 = 1_800_000_000;

fn tokens(c: &mut Criterion) {
    for (name, alg) in [
        ("ES256", KeyAlgorithm::EcdsaP256),
        ("RS256", KeyAlgorithm::Rsa2048),
    ] {
        let fixture = TokenFixture::new(alg);
        let mut group = c.benchmark_group(format!("token/{name}"));
        group.throughput(Throughput::Elements(1));
        group.bench_function("mint_bulk", |b| {
            b.iter(|| {
                fixture.issuer.mint_bulk(
                    black_box("0b6e2b1c-3c1d-4e55-9f00-5a1f2d3c4b5a"),
                    NOW,
                    259_200,
                )
            })
        });
        group.bench_function("mint_client", |b| {
            b.iter(|| fixture.client_token(black_box(NOW)))
        });
        let token = fixture.client_token(NOW);
        let revoked = Revocations::default();
        group.bench_function("verify_client", |b| {
            b.iter(|| {
                fixture
                    .verifier
                    .verify_client(black_box(token.expose()), DEVICE_THUMBPRINT, NOW, &revoked)
                    .expect("valid")
            })
        });
        group.finish();
    }
}

criterion_group!(benches, tokens);
criterion_main!(benches);
