"""NAS design import: read <base>/<shop>/<template>/ over SFTP or a local folder, hash, store."""
