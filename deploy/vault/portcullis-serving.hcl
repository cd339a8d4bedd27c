# Vault / OpenBao policy for serving Portcullis instances (RotationMode::ReadOnly):
# read the signing key ring, nothing else. Paths assume the defaults
# kv_mount = "secret" and ring_path = "portcullis/keyring"; adjust both lines together.
#
#   bao policy write portcullis-serving portcullis-serving.hcl
#
# Token lookup-self / renew-self come from the built-in "default" policy.

path "secret/data/portcullis/keyring" {
  capabilities = ["read"]
}
