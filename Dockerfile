# d7y-node in a container: run it with the host's network, e.g.
#   docker run -d --name d7y-node --network host -v /var/lib/d7y-node:/var/lib/d7y-node d7y-node
# (later features - FUSE mounts and the snapshotter socket - also need --privileged and
#  -v /run/d7y-node:/run/d7y-node:rshared).
FROM python:3.11-slim-bookworm

WORKDIR /src
COPY pyproject.toml README.md ./
COPY d7y_node ./d7y_node
RUN pip install --no-cache-dir . && rm -rf /src

VOLUME /var/lib/d7y-node
EXPOSE 65001 65002 7946/udp
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request,sys; \
    sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:65002/healthz', timeout=2).status == 200 else 1)"
STOPSIGNAL SIGTERM
ENTRYPOINT ["d7y-node"]
CMD ["start"]
