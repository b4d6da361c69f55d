# relay-agent as a container, beside the printer (host or bridge network both
# work: the agent only dials out).
#   docker build -f deploy/docker/agent.Dockerfile -t relay-agent .
#   docker run -d --restart=always -v /etc/relay/agent.toml:/etc/relay/agent.toml:ro relay-agent
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p relay-agent \
 && install -D -m 0755 target/release/relay-agent /out/relay-agent

# distroless: glibc and CA roots, no shell, runs as uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/relay-agent /usr/local/bin/relay-agent
# distroless's nonroot user, by number (hadolint DL3066)
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/relay-agent"]
CMD ["--config", "/etc/relay/agent.toml"]
