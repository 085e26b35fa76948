# clawback-operator: the person who runs `clawback vault setup`, `clawback keys
# rotate` and mints restore grants.
#
# MAY:     set up clawback's own mounts, policies and roles (idempotently); rotate
#          the transit key, rewrap wrapped keys, raise min_decryption_version;
#          mint restore grants; sign admin certificates; issue AppRole secret_ids.
# MAY NOT: decrypt a data key itself (restores go through a grant or the restore
#          role), read the chunk-id key, overwrite it (create only: written once),
#          export or delete the transit key, touch mounts/policies not named clawback-*.

# -- transit: create the key, rotate, rewrap, raise min_decryption_version ----
path "clawback-transit/keys/clawback-data" {
  capabilities = ["create", "read", "update"]
}
path "clawback-transit/keys/clawback-data/rotate" {
  capabilities = ["update"]
}
# Only min_decryption_version: not deletion_allowed, exportable or allow_plaintext_backup.
path "clawback-transit/keys/clawback-data/config" {
  capabilities = ["update"]
  allowed_parameters = {
    "min_decryption_version" = []
  }
}
path "clawback-transit/rewrap/clawback-data" {
  capabilities = ["update"]
}

# -- restore grants: tokens of the grant role only (the role fixes the policy) --
path "auth/token/create/clawback-restore-grant" {
  capabilities = ["update"]
}
path "auth/token/roles/clawback-restore-grant" {
  capabilities = ["create", "read", "update"]
}

# -- the chunk-id key: see whether it exists, create it once; never read it ----
path "clawback-kv/metadata/id-key" {
  capabilities = ["read"]
}
path "clawback-kv/data/id-key" {
  capabilities = ["create"]
}

# -- PKI: the CA, the roles, admin certificates --------------------------------
path "clawback-pki/root/generate/internal" {
  capabilities = ["update"]
}
path "clawback-pki/issuers" {
  capabilities = ["list"]
}
path "clawback-pki/cert/ca" {
  capabilities = ["read"]
}
path "clawback-pki/roles/*" {
  capabilities = ["create", "read", "update"]
}
path "clawback-pki/sign/admin" {
  capabilities = ["update"]
}

# -- setup: clawback's mounts, auth method, policies and AppRoles --------------
path "sys/mounts" {
  capabilities = ["read"]
}
path "sys/mounts/clawback-transit" {
  capabilities = ["create", "read", "update"]
}
path "sys/mounts/clawback-kv" {
  capabilities = ["create", "read", "update"]
}
path "sys/mounts/clawback-pki" {
  capabilities = ["create", "read", "update"]
}
path "sys/mounts/clawback-pki/tune" {
  capabilities = ["read", "update"]
}
path "sys/auth" {
  capabilities = ["read"]
}
path "sys/auth/approle" {
  capabilities = ["create", "read", "update", "sudo"]
}
path "sys/policies/acl/clawback-*" {
  capabilities = ["create", "read", "update"]
}
# clawback-* AppRoles: define them, read role_ids, issue (wrapped) secret_ids.
path "auth/approle/role/clawback-*" {
  capabilities = ["create", "read", "update"]
}
