# clawback-restore: a node (or an operator's machine) allowed to restore.
#
# MAY:     decrypt wrapped data keys; read the chunk-id key (restores re-check ids).
# MAY NOT: create data keys (it does not back up), rewrap or rotate, write KV,
#          sign certificates, touch sys/*.
# Prefer restore grants (clawback-restore-grant) for one-off restores: this
# role is for a standing restore host.

path "clawback-transit/decrypt/clawback-data" {
  capabilities = ["update"]
}

path "clawback-kv/data/id-key" {
  capabilities = ["read"]
}
