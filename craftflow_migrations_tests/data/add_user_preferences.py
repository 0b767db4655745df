#!/usr/bin/env python3
"""
Migration: Add user preferences table

This migration adds a new user_preferences table to store
user-specific settings and preferences.
"""

import logging

from sqlalchemy import text

logger = logging.getLogger(__name__)

def upgrade(connection):
    """Add user preferences table"""
    logger.info("üîÑ Adding user_preferences table...")

    try:
        # Check if table already exists
        result = connection.execute(text("""
            SELECT EXISTS (
                SELECT FROM information_schema.tables
                WHERE table_name = 'user_preferences'
            )
        """))

        if result.scalar():
            logger.info("‚úÖ user_preferences table already exists, skipping")
            return

        # Create the table
        connection.execute(text("""
            CREATE TABLE user_preferences (
                id SERIAL PRIMARY KEY,
                user_id INTEGER REFERENCES users(id) ON DELETE CASCADE,
                preference_key VARCHAR(100) NOT NULL,
                preference_value TEXT,
                created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
                updated_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP
            )
        """))

        # Add indexes for performance
        connection.execute(text("""
            CREATE INDEX idx_user_preferences_user_id
            ON user_preferences(user_id)
        """))

        connection.execute(text("""
            CREATE UNIQUE INDEX idx_user_preferences_user_key
            ON user_preferences(user_id, preference_key)
        """))

        logger.info("‚úÖ user_preferences table created successfully")

    except Exception as e:
        logger.error(f"‚ùå Failed to create user_preferences table: {e}")
        raise

def downgrade(connection):
    """Remove user preferences table (optional)"""
    logger.info("üîÑ Removing user_preferences table...")
    try:
        connection.execute(text("DROP TABLE IF EXISTS user_preferences CASCADE"))
        logger.info("‚úÖ user_preferences table removed successfully")
    except Exception as e:
        logger.error(f"‚ùå Failed to remove user_preferences table: {e}")
        raise
