# clawback-restore-grant: the policy of a restore grant's token.
#
# A grant is minted by the operator (token role clawback-restore-grant: orphan,
# short TTL, limited uses), response-wrapped, and handed to the target agent,
# which unwraps it once. A wrapping token that was already unwrapped is refused
# (possible interception).
# MAY:     decrypt wrapped data keys, within the token's num_uses and TTL.
# MAY NOT: anything else (the agent reads the chunk-id key with its own role).

path "clawback-transit/decrypt/clawback-data" {
  capabilities = ["update"]
}
