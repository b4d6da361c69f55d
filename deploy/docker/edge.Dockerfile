# relay-edge (with relayctl for migrations and provisioning).
#   docker build -f deploy/docker/edge.Dockerfile -t relay-edge .
#   docker run -p 8443:8443 -p 8883:8883 -p 7443:7443/udp -p 7443:7443 -p 9090:9090 \
#     -e RELAY_DATABASE_URL=postgres://relay@db/relay -v /etc/relay:/etc/relay:ro \
#     relay-edge --config /etc/relay/edge.toml
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p relay-edge -p relayctl \
 && install -D -m 0755 target/release/relay-edge /out/relay-edge \
 && install -D -m 0755 target/release/relayctl /out/relayctl

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/ /usr/local/bin/
# distroless's nonroot user, by number (hadolint DL3066)
USER 65532:65532
# wss, mqtts, agents' tunnel (QUIC on UDP, TLS on TCP where UDP is
# blocked), admin (/metrics, /healthz, /readyz)
EXPOSE 8443 8883 7443/udp 7443/tcp 9090
ENTRYPOINT ["/usr/local/bin/relay-edge"]
