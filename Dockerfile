# kpr node image. Build: docker build -t kpr .
# Debian bookworm, because bcc's Python binding comes from Debian (python3-bpfcc; the
# PyPI package called "bcc" is unrelated) and the kernel headers package gives bcc a
# header tree on hosts that ship none (controller/kernel.py builds a symlink farm of it).
FROM debian:bookworm-slim

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-venv python3-bpfcc python3-yaml \
      linux-headers-amd64 iproute2 nftables iptables ipvsadm util-linux ca-certificates \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/kpr
COPY pyproject.toml README.md ./
COPY controller ./controller
COPY bpf ./bpf
RUN python3 -m venv --system-site-packages /opt/kpr/venv \
 && /opt/kpr/venv/bin/pip install --no-cache-dir . \
 && ln -s /opt/kpr/venv/bin/kpr /usr/local/bin/kpr

ENV KPR_BPF_DIR=/opt/kpr/bpf

# The metrics (10249) and health (10256) ports, as kube-proxy's.
EXPOSE 10249 10256
ENTRYPOINT []
CMD ["kpr", "run", "--config=/etc/kpr/config.yaml"]
