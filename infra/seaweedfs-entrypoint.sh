#!/bin/sh
# SeaweedFS reads S3 identities from a JSON file: write it from the environment (AWS_ACCESS_KEY_ID,
# AWS_SECRET_ACCESS_KEY from infra/.env) so that no key is committed, then run `weed` with the
# service's command.
set -eu
umask 077
cat > /tmp/s3.json <<JSON
{"identities": [{"name": "transmute",
  "credentials": [{"accessKey": "${AWS_ACCESS_KEY_ID}", "secretKey": "${AWS_SECRET_ACCESS_KEY}"}],
  "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}
JSON
exec weed "$@" -s3.config=/tmp/s3.json
