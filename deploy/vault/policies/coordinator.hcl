# clawback-coordinator: the zero-knowledge coordinator.
#
# MAY:     get its own TLS certificate signed (PKI role "coordinator": OU=coordinator).
# MAY NOT: anything in transit (no data keys, no decrypt), read the chunk-id key
#          in KV, sign agent or admin certificates, touch sys/*.
# design.md §Threat model: the coordinator host cannot decrypt anything; this
# policy is the Vault half of that promise (the import contract is the other).

path "clawback-pki/sign/coordinator" {
  capabilities = ["update"]
}
