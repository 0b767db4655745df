"""Migration files. Each module here is one migration; see README "Adding New Migrations"."""
