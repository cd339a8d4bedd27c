# Vault / OpenBao policy for the Portcullis instance(s) that rotate keys
# (RotationMode::InProcess, and the `keys rotate` CLI): read and write the signing key
# ring. Writes use KV v2 check-and-set, so several rotators never rotate twice.
# Paths assume the defaults kv_mount = "secret" and ring_path = "portcullis/keyring".
#
#   bao policy write portcullis-rotator portcullis-rotator.hcl
#
# Token lookup-self / renew-self come from the built-in "default" policy.

path "secret/data/portcullis/keyring" {
  capabilities = ["create", "read", "update"]
}

# Version history, for operators inspecting past rings (not needed by Portcullis itself).
path "secret/metadata/portcullis/keyring" {
  capabilities = ["read"]
}
