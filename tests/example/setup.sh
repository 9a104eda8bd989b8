#!/bin/sh
# The bundled example's runAsRoot script: a data directory for uid 1000,
# the kind of thing a non-root build cannot do by itself.
mkdir /data && chown 1000:1000 /data
