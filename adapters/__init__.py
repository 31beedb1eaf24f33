"""ftctl.adapters"""
