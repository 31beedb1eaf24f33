"""ftctl.events"""
