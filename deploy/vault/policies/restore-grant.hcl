# clawback-restore-grant: the policy of a restore grant's token.
#
# A grant is minted by the operator (token role clawback-restore-grant: orphan,
# short TTL, limited uses), response-wrapped, and handed to the target agent,
# which unwraps it once. A wrapping token that was already unwrapped is refused
# (possible interception).
# MAY:     decrypt wrapped data keys, within the token's num_uses and TTL;
#          read the chunk-id key, so a holder without a role of its own (the
#          operator's CLI for `clawback ls`) can re-derive every blob id it reads.
#          A grant already reveals plaintext, so the id key adds no reach.
# MAY NOT: anything else: no data keys, no rewrap, no writes.

path "clawback-transit/decrypt/clawback-data" {
  capabilities = ["update"]
}

path "clawback-kv/data/id-key" {
  capabilities = ["read"]
}
