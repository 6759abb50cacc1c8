CREATE DATABASE outbox_test;
